"""One module per `maskrcnn` subcommand (discovered by maskrcnn.cli)."""
