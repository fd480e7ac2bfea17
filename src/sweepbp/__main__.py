from sweepbp.cli import main

main()
