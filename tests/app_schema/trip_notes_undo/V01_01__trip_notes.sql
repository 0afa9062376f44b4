-- Undo of V01_01__trip_notes.sql.
DROP TABLE IF EXISTS trip_note;
DROP TABLE IF EXISTS trip_board;
