"""A module listed as a plugin that implements no hook (a likely mistake in a recipe's plugins: list)."""

VALUE = 1
