"""What a skip says about a tool `make setup` downloads into the project prefix."""


def fetched_tool_hint(name: str) -> str:
    """`make setup` fetches NAME; a failed download is not tried again for a day (scripts/setup.sh)."""
    return f"`make setup` installs it into .prefix/bin; after a failed download, rm .prefix/{name}.unavailable to retry"
