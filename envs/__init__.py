"""Built-in environments; importing this package registers them."""
