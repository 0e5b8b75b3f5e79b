"""lloom's wire protocols as pure code: messages, validation, encoding. No I/O here."""
