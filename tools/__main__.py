from lresnet.tools.cli import main

main()
