package overlay

import (
	"os"
	"path/filepath"
)

// tempFile creates a hidden temporary file beside final, so that a rename
// replaces final atomically and a crash leaves at most a dot-file behind.
func tempFile(final string) (*os.File, error) {
	return os.CreateTemp(filepath.Dir(final), "."+filepath.Base(final)+".tmp-*")
}

// commit makes f durable and moves it to final.
func commit(f *os.File, final string) error {
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), final)
}

// syncDir makes renames in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// discard closes and removes a temporary file that will not be committed.
func discard(f *os.File) {
	f.Close()
	os.Remove(f.Name())
}
