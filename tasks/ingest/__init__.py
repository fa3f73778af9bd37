"""Documents in, chunks out: PDF, Markdown, text and records read into pages with provenance,
then split into token-sized chunks with content-hash ids."""
