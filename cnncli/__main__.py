from cnncli import interrupts

interrupts.install()  # before the CLI's imports: a Ctrl-C from the first moment is one line, never a traceback

from cnncli.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
