"""Arrow schemas and record types of seqcarry's data contract (see README, "Data contract"),
and validation of input records."""
from schemas.contract import (CHUNK_SCHEMA, DEAD_LETTER_SCHEMA, DIGEST_BYTES, OUTPUT_SCHEMA,
                              OUTPUTS_AT, PENDING_SCHEMA, CarriedState, Chunk, ChunkOutput,
                              ContractError, DeadLetter,
                              InputError, chunks_from_table, chunks_to_table,
                              dead_letters_to_table, matrices_from_array, matrix_array,
                              outputs_from_table, outputs_to_table, state_schema,
                              states_from_table, states_to_table, with_steps)

__all__ = [
    "CHUNK_SCHEMA", "DEAD_LETTER_SCHEMA", "DIGEST_BYTES", "OUTPUT_SCHEMA", "OUTPUTS_AT",
    "PENDING_SCHEMA",
    "CarriedState", "Chunk", "ChunkOutput", "ContractError", "DeadLetter", "InputError",
    "chunks_from_table", "chunks_to_table", "dead_letters_to_table", "matrices_from_array",
    "matrix_array", "outputs_from_table", "outputs_to_table", "state_schema",
    "states_from_table", "states_to_table", "with_steps",
]
