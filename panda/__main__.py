from panda.cli import main

main()
