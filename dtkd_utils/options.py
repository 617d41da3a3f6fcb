"""Reading option files and checking their keys: the one place that does it for every package.

Option files are read with PyYAML's safe loader only (BasicSR's own loader executes python tags).
Errors are :class:`dtkd_compat.OptionError` and name the file or the option key.
"""
import difflib
import os

import yaml

from dtkd_compat import MissingFileError, OptionError


def load_yaml(path, key=None):
    """Read an option file with the safe loader. Returns a dict; errors name the file (and the
    option ``key`` that gave its path, when there is one)."""
    where = f'{key}: ' if key else ''
    if not os.path.isfile(path):
        raise MissingFileError(f'{where}option file {path!r} does not exist')
    with open(path, encoding='utf-8') as f:
        try:
            opt = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise OptionError(f'{where}option file {path!r} is not valid YAML (only plain YAML is accepted, '
                              f'no python tags): {err}') from None
    if not isinstance(opt, dict):
        raise OptionError(f'{where}option file {path!r}: expected a mapping at the top level')
    return opt


def unknown_key_error(key, known, where):
    """OptionError for an unknown ``key`` of the block ``where``, suggesting the closest known key."""
    known = sorted(str(k) for k in known)
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ''
    return OptionError(f'{where}.{key}: unknown option{hint} (valid: {", ".join(known)})')


def check_keys(block, known, where):
    """Raise :func:`unknown_key_error` for the first key of the mapping ``block`` not in ``known``."""
    if not isinstance(block, dict):
        raise OptionError(f'{where}: expected a mapping, got {type(block).__name__}')
    for key in block:
        if key not in known:
            raise unknown_key_error(key, known, where)


def require(opt, key, where, kind=None):
    """``opt[key]``, which must be present, not None and (if given) of type ``kind``."""
    if key not in opt or opt[key] is None:
        raise OptionError(f'{where}{key}: required option is missing')
    if kind is not None and not isinstance(opt[key], kind):
        raise OptionError(f'{where}{key}: expected {kind.__name__}, got {type(opt[key]).__name__}')
    return opt[key]
