"""The mirror's failures, as branches of the client's one tree
(puller.errors.ClientError): str() of each is the one line the CLI prints.

    ClientError
    └── MirrorError                 anything a mirror command refuses
        ├── ImagesFileError             an images file entry outside the format (with its line)
        ├── BundleError                 a bundle that is not one, or is damaged
        │   └── SignatureError              the bundle manifest's signature is absent or wrong
        └── PrerequisiteError           the target lacks what a delta bundle builds on
"""

from __future__ import annotations

from puller.errors import ClientError


class MirrorError(ClientError):
    pass


class ImagesFileError(MirrorError):
    def __init__(self, path: str, line: int | None, message: str):
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")
        self.path, self.line = path, line


class BundleError(MirrorError):
    pass


class SignatureError(BundleError):
    pass


class PrerequisiteError(MirrorError):
    def __init__(self, target: str, missing: list[str]):
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        super().__init__(f"{target} lacks {len(missing)} prerequisite(s) of this delta bundle: {shown}; "
                         f"nothing was pushed (import the bundle it builds on first)")
        self.missing = missing
