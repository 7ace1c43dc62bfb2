"""The offline teacher cache: its format and reader (:mod:`.format`) and its writer (:mod:`.writer`)."""
