package overlay

import (
	"fmt"
	"io"
	"os"
)

// OpenInput opens the files of a custom VM: its disk and memory images,
// its device state and, if vmConfig is not "", its vm.json. Close the
// returned function when the build is done. Errors name the file by what
// it is: disk, memory, state or vm-config.
func OpenInput(disk, memory, state, vmConfig string) (_ *Input, _ func(), err error) {
	in := &Input{}
	var files []*os.File
	closeAll := func() {
		for _, f := range files {
			f.Close()
		}
	}
	defer func() {
		if err != nil {
			closeAll()
		}
	}()
	for img, p := range [2]string{disk, memory} {
		f, size, err := openImage(Image(img).String(), p)
		if err != nil {
			return nil, nil, err
		}
		files = append(files, f)
		in.Images[img], in.Sizes[img] = f, size
	}
	if in.State, err = readSmall("state", state, MaxStateSize); err != nil {
		return nil, nil, err
	}
	if vmConfig != "" {
		if in.VMConfig, err = readSmall("vm-config", vmConfig, MaxVMConfigSize); err != nil {
			return nil, nil, err
		}
	}
	return in, closeAll, nil
}

// openImage opens a custom image and returns it with its size.
func openImage(what, path string) (*os.File, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", what, err)
	}
	st, err := f.Stat()
	if err == nil && !st.Mode().IsRegular() {
		err = fmt.Errorf("not a regular file")
	}
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("%s %s: %w", what, path, err)
	}
	return f, st.Size(), nil
}

// readSmall reads a small file whole, refusing one larger than limit.
func readSmall(what, path string, limit int64) ([]byte, error) {
	f, size, err := openImage(what, path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if size > limit {
		return nil, fmt.Errorf("%s %s: %d bytes, more than the limit of %d", what, path, size, limit)
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", what, path, err)
	}
	return b, nil
}
