"""The Flower ServerApp and ClientApp that wire data, clients and strategies together."""
