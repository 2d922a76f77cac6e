package main

import (
	"fmt"
	"net"

	"github.com/dustin/go-humanize"
	"github.com/urfave/cli/v2"

	"github.com/cloudletfs/cloudletfs/serve"
)

func linkCommand() *cli.Command {
	return &cli.Command{
		Name:      "link",
		Usage:     "relay TCP connections to a target over an emulated slow link",
		UsageText: "cloudletfs link [--listen 127.0.0.1:0] [--rate RATE] [--rtt DURATION] TARGET_HOST:PORT",
		Description: `Emulates a slow WAN link between two cloudlets, or between a cloudlet and an
overlay server, for tests and benchmarks: point a client at the address it listens
on instead of at TARGET, and its TCP connections reach TARGET (dialed anew for
each connection) as if across that link. Any TCP stream goes through: HTTP, the
cloudlet's API, a QEMU migration stream.

--rate is the capacity of each direction (e.g. 25mbit, 1gbit, 5MB for bytes per
second), one token bucket per direction shared by all connections, like one access
link. --rtt is the round-trip time: each direction delays its bytes by half of it,
as a stream, so a request and its response take one RTT more than they would without
the link. A half-close (FIN) is passed on, delayed like the data.

Once listening it prints 'link listening on ADDR to TARGET', with the port chosen
for --listen ...:0. On SIGINT or SIGTERM it closes every connection, prints
'link: N connections, UP bytes up, DOWN bytes down' and exits 0.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:0", Usage: "address to listen on; port 0 picks a free one"},
			&cli.StringFlag{Name: "rate", Value: "0", Usage: "rate of each direction, e.g. 25mbit (0: unlimited)"},
			&cli.DurationFlag{Name: "rtt", Usage: "round-trip time, half of it added to each direction, e.g. 20ms"},
		},
		Action: linkCmd,
	}
}

func linkCmd(c *cli.Context) error {
	target := c.Args().First()
	if host, port, err := net.SplitHostPort(target); err != nil || host == "" || port == "" {
		return badFlag("TARGET %q: want HOST:PORT, such as 127.0.0.1:8080", target)
	}
	rate, err := serve.ParseRate(c.String("rate"))
	if err != nil {
		return badFlag("--rate %q: want a link rate such as 25mbit, or 0 for no limit", c.String("rate"))
	}
	ln, err := net.Listen("tcp", c.String("listen"))
	if err != nil {
		return fmt.Errorf("link: %w", err)
	}
	log := logger(c)
	l := serve.NewLink(ln, target, serve.LinkOptions{Rate: rate, RTT: c.Duration("rtt"), Log: log})
	shown := "unlimited"
	if rate > 0 {
		shown = humanize.SI(rate*8, "bit") + "/s"
	}
	log.Info().Str("rate", shown).Str("rtt", c.Duration("rtt").String()).Msg("emulated link")
	fmt.Fprintf(c.App.Writer, "link listening on %s to %s\n", l.Addr(), target)
	served := make(chan error, 1)
	go func() { served <- l.Serve() }()
	select {
	case err = <-served:
		l.Close()
	case <-c.Context.Done():
		l.Close()
		err = <-served
	}
	if err != nil {
		return err
	}
	s := l.Stats()
	fmt.Fprintf(c.App.Writer, "link: %d connections, %d bytes up, %d bytes down\n", s.Conns, s.Up, s.Down)
	return nil
}
