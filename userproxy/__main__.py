from userproxy.cli import main

main()
