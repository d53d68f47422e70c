from lresnet.tools import main

main()
