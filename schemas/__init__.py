"""Arrow schemas and record types of seqcarry's data contract (see README, "Data contract")."""
from schemas.contract import (CHUNK_SCHEMA, OUTPUT_SCHEMA, SCHEMA_VERSION, CarriedState, Chunk,
                              ChunkOutput, ContractError, chunks_from_table, chunks_to_table,
                              matrices_from_array, matrix_array, outputs_from_table,
                              outputs_to_table, state_schema, states_from_table, states_to_table)

__all__ = [
    "CHUNK_SCHEMA", "OUTPUT_SCHEMA", "SCHEMA_VERSION", "CarriedState", "Chunk", "ChunkOutput",
    "ContractError", "chunks_from_table", "chunks_to_table", "matrices_from_array",
    "matrix_array", "outputs_from_table", "outputs_to_table", "state_schema",
    "states_from_table", "states_to_table",
]
