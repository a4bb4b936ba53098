from lynx_zoo.cli import run

run()
