package fetch

import "time"

// MaxWaits is how many waits the percentiles are taken from.
const MaxWaits = maxWaits

// Waiting returns how many reads are waiting on the network now.
func (f *Fetcher) Waiting() int {
	f.st.mu.Lock()
	defer f.st.mu.Unlock()
	return f.st.waiting
}

// NoteWaits records n reads that each waited d.
func (f *Fetcher) NoteWaits(n int, d time.Duration) {
	for range n {
		f.st.beginWait()
		f.st.endWait(d)
	}
}
