"""The `memenc` command line (Typer + rich). Parsing, rendering and exit codes only: each
command calls one library function."""
