"""A small shop package with two import cycles (models <-> pricing, orders -> billing -> notify -> orders)."""
