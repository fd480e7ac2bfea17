from sweepbp.cli.main import main

if __name__ == "__main__":  # not when multiprocessing re-imports the main module (spawn, forkserver)
    main()
