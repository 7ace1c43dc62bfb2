"""Command drivers behind ``opd-plugins``' subcommands that are not trainer runs (the CLI only parses and dispatches)."""
