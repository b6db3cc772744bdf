"""Indexes: recipes, building, ranking spaces and the searchers over them."""
