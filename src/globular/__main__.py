from globular.cli import main

main()
