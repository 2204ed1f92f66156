"""SecAgg+ building blocks shared by server and client: parameters, masks, keys (numpy and Flower's crypto)."""
