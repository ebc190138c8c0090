# A regular package, so `tests.helpers` is this folder's even when an installed wheel ships a top-level
# `tests` package (verl's does): a regular package earlier on sys.path wins over it, a namespace one does not.
