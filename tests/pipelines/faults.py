"""``python -m tests.pipelines.faults kill <stage> <epoch> -- <pipelines.compress arguments>``: the command, in a real
process that kills itself (SIGKILL, as ``kill -9`` does) right after stage ``<stage>`` saved its epoch ``<epoch>``:
a point the test chooses, not one a sleep guesses at."""
import os
import signal
import sys


def main(argv):
    fault, stage, epoch, sep, *args = argv
    assert fault == "kill" and sep == "--", argv
    from edge_kd import train

    save = train.EpochCheckpoints.save

    def save_then_die(self, model, epochs, history):
        save(self, model, epochs, history)
        if self.folder.name == stage and epochs == int(epoch):
            os.kill(os.getpid(), signal.SIGKILL)

    train.EpochCheckpoints.save = save_then_die
    from pipelines import compress

    return compress.main(args, quiet_native=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
