package fetch

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// Staged returns src with the segments of o that dir holds read from
// there: a handoff's destination keeps the segments sent ahead in files
// named by the sha256 of their bytes, in hex. The fetcher verifies them
// as it does any segment; a file that fails is fetched from src instead
// on the next try.
func Staged(src Source, o *overlay.Overlay, dir string) Source {
	s := &stagedSource{Source: src, dir: dir, at: map[[2]int64]string{}}
	for _, seg := range o.Manifest.Segments {
		name := filepath.Join(dir, seg.SHA.String())
		if st, err := os.Stat(name); err == nil && st.Size() == int64(seg.Stored) {
			s.at[[2]int64{seg.Offset, int64(seg.Stored)}] = name
			s.Count++
		}
	}
	return s
}

type stagedSource struct {
	Source
	dir   string
	mu    sync.Mutex
	at    map[[2]int64]string
	Count int // segments staged
}

func (s *stagedSource) ReadRange(ctx context.Context, off, n int64) ([]byte, error) {
	k := [2]int64{off, n}
	s.mu.Lock()
	name, ok := s.at[k]
	// Used once: a second read of it means it failed verification, and
	// comes from the source.
	delete(s.at, k)
	s.mu.Unlock()
	if ok {
		if f, err := os.Open(name); err == nil {
			defer f.Close()
			b := make([]byte, n)
			if _, err := io.ReadFull(f, b); err == nil {
				return b, nil
			}
		}
	}
	return s.Source.ReadRange(ctx, off, n)
}

func (s *stagedSource) String() string {
	return fmt.Sprintf("%s (with %d segments staged in %s)", s.Source, s.Count, s.dir)
}
