"""The ground floor of the core: errors, checked values and text files. Imports nothing of the project.

- `errors`: `InputError` (bad input, exit status 2 on the command line) and its kinds.
- `values`: seeds, finite numbers and tensors, templates: the checks every layer above shares.
- `textfiles`: the one reader of text files (prompt lists, CSV tables), refusing binary and
  malformed files with the field, file and line.
"""
