"""Flatcar Container Linux: which release ships a kernel, its developer container
(fetched, verified and cached), and that image mounted as a build root.

The submodules are imported where they are used, not here: `init`, `load` and
`status` need only `release`, and `fetch` pulls in http.client, ssl and email
(tens of milliseconds natively, a good part of a second under emulation).
"""
