// Package qemu drives stock QEMU: a small QMP client, the command lines that
// boot a VM with its RAM in a file and resume one from files, and capture
// and resume over QMP. It knows nothing of the overlay format.
package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// Client speaks QMP, QEMU's line-delimited JSON protocol, over one
// connection. Every call has a deadline. Events that arrive while waiting
// for a reply are kept for WaitEvent.
type Client struct {
	conn net.Conn
	r    *bufio.Reader

	mu     sync.Mutex
	nextID int
	events []Event
}

// Event is an asynchronous QMP event.
type Event struct {
	Name string          `json:"event"`
	Data json.RawMessage `json:"data"`
}

// Error is an error QEMU returned for a command.
type Error struct {
	Command string
	Class   string `json:"class"`
	Desc    string `json:"desc"`
}

func (e *Error) Error() string { return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc) }

// message is any line QEMU sends.
type message struct {
	QMP    json.RawMessage `json:"QMP"`
	Return json.RawMessage `json:"return"`
	Error  *Error          `json:"error"`
	Event  string          `json:"event"`
	Data   json.RawMessage `json:"data"`
	ID     *int            `json:"id"`
}

// maxEvents bounds the events kept for WaitEvent.
const maxEvents = 256

// Dial connects to a QMP unix socket, retrying until ctx ends (QEMU creates
// the socket some time after it starts), reads the greeting and enters
// command mode.
func Dial(ctx context.Context, path string) (*Client, error) {
	var conn net.Conn
	for {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			conn = c
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("qmp: %s never answered: %w", path, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	c := &Client{conn: conn, r: bufio.NewReaderSize(conn, 64<<10)}
	m, err := c.read(ctx)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp: greeting: %w", err)
	}
	if m.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("qmp: %s did not greet with QMP: not a QMP socket", path)
	}
	if _, err := c.Execute(ctx, "qmp_capabilities", nil); err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// read reads one message, honouring ctx's deadline.
func (c *Client) read(ctx context.Context) (*message, error) {
	if dl, ok := ctx.Deadline(); ok {
		c.conn.SetReadDeadline(dl)
	} else {
		c.conn.SetReadDeadline(time.Time{})
	}
	line, err := c.r.ReadBytes('\n')
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil, fmt.Errorf("no reply before the deadline: %w", context.DeadlineExceeded)
		}
		return nil, err
	}
	var m message
	if err := json.Unmarshal(line, &m); err != nil {
		return nil, fmt.Errorf("bad QMP message %q: %w", truncate(line, 200), err)
	}
	return &m, nil
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

// Execute runs a command and returns its "return" value. ctx bounds the
// whole exchange; without a deadline of its own, 30 s apply.
func (c *Client) Execute(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.nextID++
	id := c.nextID
	req := map[string]any{"execute": cmd, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		c.conn.SetWriteDeadline(dl)
	}
	if _, err := c.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("qmp %s: %w", cmd, err)
	}
	for {
		m, err := c.read(ctx)
		if err != nil {
			return nil, fmt.Errorf("qmp %s: %w", cmd, err)
		}
		switch {
		case m.Event != "":
			c.keep(Event{Name: m.Event, Data: m.Data})
		case m.ID != nil && *m.ID != id:
			// A reply to an earlier call that gave up waiting.
		case m.Error != nil:
			m.Error.Command = cmd
			return nil, m.Error
		case m.Return != nil:
			return m.Return, nil
		}
	}
}

func (c *Client) keep(e Event) {
	if len(c.events) == maxEvents {
		c.events = c.events[1:]
	}
	c.events = append(c.events, e)
}

// WaitEvent returns the first event named name, kept or still to come.
func (c *Client) WaitEvent(ctx context.Context, name string) (Event, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, e := range c.events {
		if e.Name == name {
			c.events = append(c.events[:i], c.events[i+1:]...)
			return e, nil
		}
	}
	for {
		m, err := c.read(ctx)
		if err != nil {
			return Event{}, fmt.Errorf("qmp: waiting for event %s: %w", name, err)
		}
		if m.Event == name {
			return Event{Name: m.Event, Data: m.Data}, nil
		}
		if m.Event != "" {
			c.keep(Event{Name: m.Event, Data: m.Data})
		}
	}
}

// Status returns the VM's run state, e.g. "running", "paused", "inmigrate".
func (c *Client) Status(ctx context.Context) (string, error) {
	r, err := c.Execute(ctx, "query-status", nil)
	if err != nil {
		return "", err
	}
	var s struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(r, &s); err != nil {
		return "", fmt.Errorf("qmp query-status: %w", err)
	}
	return s.Status, nil
}

// MigrationStatus returns query-migrate's status and error, if any.
func (c *Client) MigrationStatus(ctx context.Context) (string, string, error) {
	r, err := c.Execute(ctx, "query-migrate", nil)
	if err != nil {
		return "", "", err
	}
	var s struct {
		Status string `json:"status"`
		Error  string `json:"error-desc"`
	}
	if err := json.Unmarshal(r, &s); err != nil {
		return "", "", fmt.Errorf("qmp query-migrate: %w", err)
	}
	return s.Status, s.Error, nil
}
