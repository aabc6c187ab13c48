// Command gohost loads a SPIRE UpstreamAuthority plugin the way SPIRE does. It starts the plugin
// binary through hashicorp/go-plugin's client with SPIRE's handshake settings and announces a host
// service on the go-plugin broker. Then it calls Init and Configure, mints an X.509 CA for a fresh
// CSR and checks the minted chain with crypto/x509.
//
// It exits 0 after printing one summary line to stdout, 1 when a check fails or a call errors,
// and 2 on invalid flags. The build script scripts/go-host-check.sh generates the protobuf
// packages it imports and builds it offline from Debian's Go packages.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hashicorp/go-plugin"
)

// Exit codes.
const (
	exitFailed = 1
	exitUsage  = 2
)

// killGrace is how long the watchdog waits past -timeout for the run to unwind before it kills
// the plugin and exits. go-plugin's Kill alone may wait 2 s for a graceful shutdown.
const killGrace = 10 * time.Second

type options struct {
	pluginPath   string
	trustDomain  string
	hclFile      string
	timeout      time.Duration
	preferredTTL time.Duration
	logLevel     string
	outDir       string
}

func main() {
	opts, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintf(os.Stderr, "gohost: %v\n", err)
		os.Exit(exitUsage)
	}

	hcl, err := os.ReadFile(opts.hclFile)
	if err != nil {
		fmt.Fprintf(os.Stderr, "gohost: reading -hcl-file: %v\n", err)
		os.Exit(exitUsage)
	}

	ctx, cancel := context.WithTimeout(context.Background(), opts.timeout)
	defer cancel()

	done := make(chan runResult, 1)
	go func() {
		summary, err := run(ctx, opts, string(hcl))
		done <- runResult{summary: summary, err: err}
	}()

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)

	select {
	case result := <-done:
		if result.err != nil {
			fmt.Fprintf(os.Stderr, "gohost: FAILED: %v\n", result.err)
			os.Exit(exitFailed)
		}
		fmt.Println(result.summary)
	case sig := <-signals:
		plugin.CleanupClients()
		fmt.Fprintf(os.Stderr, "gohost: FAILED: stopped by signal %v\n", sig)
		os.Exit(exitFailed)
	case <-time.After(opts.timeout + killGrace):
		plugin.CleanupClients()
		fmt.Fprintf(os.Stderr, "gohost: FAILED: the run did not finish within -timeout %v (plus %v to unwind); killed the plugin\n",
			opts.timeout, killGrace)
		os.Exit(exitFailed)
	}
}

type runResult struct {
	summary string
	err     error
}

func parseFlags(args []string) (options, error) {
	var opts options
	fs := flag.NewFlagSet("gohost", flag.ContinueOnError)
	fs.StringVar(&opts.pluginPath, "plugin", "", "path of the UpstreamAuthority plugin executable (required)")
	fs.StringVar(&opts.trustDomain, "trust-domain", "", "trust domain name sent in Configure and put in the CSR, such as example.org (required)")
	fs.StringVar(&opts.hclFile, "hcl-file", "", "file whose text is sent as the plugin's HCL configuration (required)")
	fs.DurationVar(&opts.timeout, "timeout", 60*time.Second, "time limit for the whole run, from plugin start to shutdown")
	fs.DurationVar(&opts.preferredTTL, "preferred-ttl", 24*time.Hour, "preferred_ttl sent with the CSR, rounded down to whole seconds (SPIRE sends its ca_ttl, 24h by default)")
	fs.StringVar(&opts.outDir, "out-dir", "", "existing folder to write x509_ca_chain.pem and upstream_x509_roots.pem into, from the first mint response (optional)")
	fs.StringVar(&opts.logLevel, "log-level", "info", "go-plugin client log level on stderr: trace, debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return opts, err
	}

	if fs.NArg() != 0 {
		return opts, fmt.Errorf("unexpected arguments %q: pass every option as a flag", fs.Args())
	}
	var missing []string
	if opts.pluginPath == "" {
		missing = append(missing, "-plugin")
	}
	if opts.trustDomain == "" {
		missing = append(missing, "-trust-domain")
	}
	if opts.hclFile == "" {
		missing = append(missing, "-hcl-file")
	}
	if len(missing) > 0 {
		return opts, fmt.Errorf("missing required flags %v", missing)
	}
	if err := validateTrustDomain(opts.trustDomain); err != nil {
		return opts, err
	}
	if opts.timeout <= 0 {
		return opts, errors.New("-timeout must be positive")
	}
	if opts.preferredTTL < 0 || opts.preferredTTL.Seconds() > float64(1<<31-1) {
		return opts, fmt.Errorf("-preferred-ttl %v does not fit a non-negative int32 number of seconds", opts.preferredTTL)
	}
	return opts, nil
}

// run drives one plugin session and returns the summary line.
func run(ctx context.Context, opts options, hcl string) (string, error) {
	session, err := startPlugin(ctx, opts)
	if err != nil {
		return "", err
	}
	defer session.stop()

	if err := session.probeBrokerStream(ctx); err != nil {
		return "", err
	}
	health := session.checkHealth(ctx)

	services, err := session.initPlugin(ctx)
	if err != nil {
		return "", err
	}

	if err := session.configure(ctx, opts.trustDomain, hcl); err != nil {
		return "", err
	}

	minted, err := session.mintAndCheck(ctx, opts.trustDomain, int32(opts.preferredTTL/time.Second), opts.outDir)
	if err != nil {
		return "", err
	}

	deinit, err := session.deinit(ctx)
	if err != nil {
		return "", err
	}

	return fmt.Sprintf("gohost: ok: plugin %s advertised %d services, health %s, Configure ok, minted %s, Deinit %s",
		opts.pluginPath, len(services), health, minted, deinit), nil
}

// validateTrustDomain accepts a bare SPIFFE trust domain name: lowercase letters, digits, '.', '-'
// and '_'. SPIRE sends the name without the spiffe:// scheme in Configure.
func validateTrustDomain(trustDomain string) error {
	for _, r := range trustDomain {
		valid := (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') || r == '.' || r == '-' || r == '_'
		if !valid {
			return fmt.Errorf("invalid -trust-domain %q: use a bare name such as example.org, with lowercase letters, digits, '.', '-' and '_' only", trustDomain)
		}
	}
	return nil
}
