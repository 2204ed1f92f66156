"""SecAgg+ building blocks both sides use: parameters, masks, vectors, keys, Shamir."""
