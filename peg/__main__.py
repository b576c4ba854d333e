from peg.cli import app

app()
