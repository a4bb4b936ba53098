from lynx_zoo.cli import main

main()
