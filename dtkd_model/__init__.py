import dtkd_compat  # noqa: F401  (must precede basicsr)

_modules = dtkd_compat.import_modules(__name__, __file__, '_model')


def __getattr__(name):
    # The teacher pulls in large networks; import it only when asked for.
    if name == 'ResShiftTeacher':
        from dtkd_model.resshift_teacher import ResShiftTeacher

        return ResShiftTeacher
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
