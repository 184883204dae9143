"""The compiled CPU kernel's status: whether it applies to this process, and why not.

`usable()` is True when the kernel applies to what is being traced (the CPU backend, no device
mesh, the kernel compiled and loaded); `reason()` says why it does not ("ok" when it does);
`describe(train)` which implementation a training run with these settings takes; `load()`
compiles and registers it (once per process).
"""

from ._kernel import describe as describe, load as load, reason as reason, usable as usable
