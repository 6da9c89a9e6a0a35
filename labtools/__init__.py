"""labtools."""
