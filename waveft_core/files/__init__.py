"""Files on disk: the native format (fileformat), other trainers' files (kohya), what kind a file is (kinds),
safe reading and atomic writing (storage), the limits a hostile file meets (limits), and the metadata written
beside the tensors (metadata)."""
