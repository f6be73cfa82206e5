"""The importable home of the contract's generated code (`profiles.<package>.v1`) and the CLI."""
