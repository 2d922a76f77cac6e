package fetch

// Waiting returns how many reads are waiting on the network now.
func (f *Fetcher) Waiting() int {
	f.st.mu.Lock()
	defer f.st.mu.Unlock()
	return f.st.waiting
}
