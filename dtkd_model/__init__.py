import dtkd_compat  # noqa: F401  (must precede basicsr)

_modules = dtkd_compat.import_modules(__name__, __file__, '_model')
