"""Storage tiers: `base` defines the interfaces, one module per tier implements them."""
