from globular.cli import entry

entry()
