from capdec.cli import entry

entry()
