"""Files on disk: the native format (fileformat), other trainers' files (kohya), what kind a file is (kinds),
safe reading and atomic writing (storage), the limits a hostile file meets (limits), and the metadata written
beside the tensors (metadata)."""

# The names the hosts (nodes/, a1111/) use. The torch-free modules only: the readers (fileformat, kohya, metadata)
# are imported as modules (`from waveft_core.files import fileformat`), since kohya needs convert/, which needs
# this package's modules.
from .kinds import KOHYA, NATIVE, SPECTRA, is_waveft, is_waveft_file, kind_of, stores_positions
from .printable import printable, short_list
from .storage import WaveFTFileError, peek_header, read_header, reporting_file_errors

__all__ = [
    "KOHYA",
    "NATIVE",
    "SPECTRA",
    "SPECTRUM",
    "WaveFTFileError",
    "is_waveft",
    "is_waveft_file",
    "kind_of",
    "peek_header",
    "printable",
    "read_header",
    "reporting_file_errors",
    "short_list",
    "stores_positions",
]
