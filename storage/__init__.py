"""Storage, below :mod:`transforms` and above :mod:`schemas`: file IO through fsspec
(:mod:`storage.files`), the state store and its commit protocol
(:mod:`storage.state`), and the fault points tests use (:mod:`storage.faults`)."""
from schemas.manifest import RETIRED, CommitRecord, FileRecord, Manifest, newest_layer
from storage.faults import FAULT_ENV, FAULT_STAGES, InjectedFault, fault_point
from storage.files import (IntegrityError, ParquetInput, StorageError, UnreadableFile,
                           check_location, exists, join, list_files,
                           list_names, local_copy, local_copy_checkpoint, read_bytes,
                           read_ipc_rows, read_json, read_table, read_table_rows,
                           remove_file, remove_tree,
                           write_bytes, write_ipc_named_by_content, write_json,
                           write_table)
from storage.state import (DEFAULT_ORPHAN_GRACE_SECONDS, StateConflictError, StateStore,
                           UnsupportedLocation, check_retention, file_key,
                           read_json_object, remove_other_attempts, run_file_url)

__all__ = [
    "DEFAULT_ORPHAN_GRACE_SECONDS", "FAULT_ENV", "FAULT_STAGES", "RETIRED", "CommitRecord",
    "FileRecord", "InjectedFault", "IntegrityError", "Manifest", "ParquetInput",
    "StateConflictError", "StateStore", "StorageError", "UnreadableFile",
    "UnsupportedLocation", "check_location", "check_retention", "exists", "fault_point",
    "file_key", "join", "list_files", "list_names", "local_copy",
    "local_copy_checkpoint", "newest_layer", "read_bytes", "read_ipc_rows", "read_json",
    "read_json_object", "read_table", "read_table_rows", "remove_file", "remove_other_attempts", "remove_tree",
    "run_file_url", "write_bytes", "write_ipc_named_by_content", "write_json",
    "write_table",
]
