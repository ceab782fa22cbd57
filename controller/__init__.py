"""devstack controller: turns route sources into immutable, versioned route tables."""
