package fs

// SetStreamLimit sets how many bytes each of m's streams keeps at least (it
// keeps at most twice that), so that a test can make a follower fall
// behind with a few hundred lines rather than megabytes of them.
func SetStreamLimit(m *Mount, bytes int) {
	for _, l := range []*eventLog{&m.rec.accessed, &m.rec.fetched, &m.rec.modifiedLog, &m.rec.io} {
		l.mu.Lock()
		l.limit = bytes
		l.mu.Unlock()
	}
}
