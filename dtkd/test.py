"""``dtkd-test -opt options/test/<file>.yml``: BasicSR's test runner with the DTKD classes."""
from dtkd.launch import run


def main():
    from basicsr import test

    run(test, 'test_pipeline', is_train=False)


if __name__ == '__main__':
    main()
